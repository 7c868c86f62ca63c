"""A small hand-written set of exam-style questions, for development checks only.

Never used for training, fitting or thresholds. Written for this project (not copied from any exam
or dataset) to look like the traffic the issue worries about: bar-exam fact patterns, clinical
vignettes, algorithm questions, and general questions. Because it was looked at while designing the
router, its accuracy is an optimistic estimate; the out-of-style check set built from the data
folder is the honest one.
"""

from __future__ import annotations

LAW = (
    "A landowner conveyed her farm to her nephew by a deed that was never recorded. Two years later she conveyed the same farm to a buyer who paid value and had no notice of the earlier deed. The jurisdiction has a race-notice statute. Who owns the farm?",
    "A police officer stopped a car for a broken taillight and, without consent, searched the locked trunk, finding stolen jewelry. The driver moves to suppress the jewelry. Should the motion be granted?",
    "During a trial for assault, the prosecution offers testimony that the defendant had been convicted of assault twice before, to show he is a violent person. Is the evidence admissible?",
    "A contractor agreed to build a garage for $20,000. Halfway through, the owner told him to stop work without any reason. What damages can the contractor recover for breach of contract?",
    "A homeowner set a spring gun in his empty vacation cabin to deter burglars. A trespasser who broke in was injured. Is the homeowner liable for battery?",
    "A state statute prohibits the sale of any newspaper that criticizes the governor. A publisher challenges the statute. Which constitutional provision gives the strongest ground for the challenge?",
    "What is the difference between a fee simple determinable and a fee simple subject to a condition subsequent?",
    "Under the Federal Rules of Civil Procedure, when may a defendant remove a case from state court to federal court?",
    "A man intending to kill his neighbor fired a gun at him but missed and killed a bystander. What crime, if any, is the man guilty of with respect to the bystander?",
    "An offeror mailed an offer on Monday and then mailed a revocation on Tuesday. The offeree mailed an acceptance on Wednesday and received the revocation on Thursday. Was a contract formed?",
    "Explain the elements a plaintiff must prove to establish a claim of negligence.",
    "A tenant under a five-year lease assigned the lease to a third party, who then stopped paying rent. Can the landlord recover the unpaid rent from the original tenant?",
    "Is a confession obtained after the suspect asked for a lawyer, but before one arrived, admissible at trial?",
    "A buyer and seller signed a written agreement for the sale of 500 widgets but did not state a price. Is the contract enforceable under the Uniform Commercial Code?",
    "What is the rule against perpetuities and how does it apply to a gift to the first grandchild to reach age 25?",
    "A witness testifies at a deposition and dies before trial. Can the deposition transcript be admitted at trial over a hearsay objection?",
    "Can a state tax goods shipped in from other states at a higher rate than goods produced within the state?",
    "A defendant was charged with burglary after entering a store during business hours and stealing a watch. Is he guilty of common law burglary?",
    "What must a plaintiff show to obtain a preliminary injunction in federal court?",
    "An employer fired an employee for serving on a jury. Does the employee have a claim for wrongful discharge?",
)

MEDICAL = (
    "A 58-year-old man presents with crushing substernal chest pain radiating to the left arm for 40 minutes, with diaphoresis. ECG shows ST elevation in leads II, III and aVF. What is the most likely diagnosis?",
    "A 24-year-old woman has fatigue, weight loss, heat intolerance and a fine tremor. Her TSH is suppressed and free T4 is elevated. Which is the most appropriate next step in management?",
    "A 6-year-old boy has periorbital edema and frothy urine two weeks after a sore throat. Urinalysis shows red cell casts. What is the most likely diagnosis?",
    "A 70-year-old woman on warfarin presents with melena and an INR of 8. What is the best immediate treatment?",
    "A 30-year-old man develops fever, neck stiffness and photophobia. Lumbar puncture shows high neutrophils and low glucose. What is the most likely causative organism?",
    "Which class of drugs is first-line for treating hypertension in a patient with diabetes and proteinuria?",
    "A patient with long-standing diabetes complains of burning pain in both feet that is worse at night. What is the mechanism of this neuropathy?",
    "A 45-year-old woman has right upper quadrant pain after fatty meals, fever and a positive Murphy sign. What imaging test should be ordered first?",
    "What are the side effects of long-term corticosteroid therapy?",
    "A newborn has bilious vomiting in the first day of life and a double bubble sign on abdominal X-ray. What is the diagnosis?",
    "A 65-year-old smoker has hemoptysis, weight loss and hypercalcemia. Which type of lung cancer is most likely?",
    "How does metformin lower blood glucose, and when is it contraindicated?",
    "A 19-year-old college student has fever, sore throat, posterior cervical lymphadenopathy and splenomegaly. What test confirms the diagnosis?",
    "A patient receiving penicillin develops wheezing, hypotension and urticaria within minutes. What is the first drug to give?",
    "What is the mechanism of action of aspirin in preventing heart attacks?",
    "A 35-year-old woman has a malar rash, joint pain and proteinuria. Which antibody is most specific for her likely disease?",
    "A pregnant woman at 32 weeks has blood pressure of 165/110, headache and proteinuria. What is the treatment to prevent seizures?",
    "What vaccinations are recommended for adults over 65?",
    "An elderly man has a resting tremor, rigidity and shuffling gait. Which neurotransmitter is deficient?",
    "A child has recurrent wheezing and cough at night, relieved by albuterol. What is the long-term controller medication of choice?",
)

CODE = (
    "What is the time complexity of searching for an element in a balanced binary search tree?",
    "Explain the difference between breadth-first search and depth-first search and when to use each.",
    "How does quicksort choose a pivot, and what is its worst-case running time?",
    "Which data structure would you use to implement a LRU cache with O(1) get and put operations?",
    "Given an array of integers, find the length of the longest increasing subsequence. Describe a dynamic programming solution.",
    "What is the difference between a process and a thread?",
    "Why is Dijkstra's algorithm incorrect when the graph has negative edge weights?",
    "What does the 'static' keyword mean in Java?",
    "How would you detect a cycle in a linked list using constant extra memory?",
    "Explain what a hash collision is and two ways to resolve it.",
    "What is the amortized cost of appending to a dynamic array, and why?",
    "Write a SQL query that returns the second highest salary from an Employees table.",
    "What is the difference between a stack and a queue? Give an example use of each.",
    "How does garbage collection work in languages like Java or Python?",
    "Prove that any comparison-based sorting algorithm needs Omega(n log n) comparisons in the worst case.",
    "What is a deadlock and what four conditions must hold for it to occur?",
    "Explain Big-O notation with an example of an O(n^2) algorithm.",
    "How do you reverse a string in JavaScript?",
    "What is the difference between TCP and UDP?",
    "Describe how a heap supports insert and extract-min, and the cost of each.",
)

GENERAL = (
    "What is the capital of Australia?",
    "Give me three ideas for a birthday party for a ten-year-old.",
    "Who wrote the novel Pride and Prejudice?",
    "Why is the sky blue?",
    "Summarize the plot of the movie Titanic in two sentences.",
    "What are some good tips for growing tomatoes in a small garden?",
    "Which planet is the largest in our solar system?",
    "Write a short poem about autumn leaves.",
    "What is the difference between a crocodile and an alligator?",
    "How do I make a good cup of coffee with a French press?",
    "Classify each of these as a fruit or a vegetable: apple, carrot, banana, broccoli.",
    "What causes the seasons on Earth?",
    "Who won the FIFA World Cup in 2014?",
    "What should I pack for a week-long hiking trip?",
    "How does a hot air balloon stay in the air?",
    "What is the tallest mountain in Africa?",
    "Name five famous painters from the Renaissance.",
    "What is the best way to learn to play the guitar as an adult?",
    "Why do cats purr?",
    "What were the main causes of World War I?",
)


def probe_items() -> list[tuple[str, str]]:
    """``(text, label)`` pairs over the router labels ``law``, ``code``, ``medical``, ``base``."""
    return (
        [(t, "law") for t in LAW]
        + [(t, "code") for t in CODE]
        + [(t, "medical") for t in MEDICAL]
        + [(t, "base") for t in GENERAL]
    )
